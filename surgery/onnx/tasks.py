"""Which task a checkpoint's head computes, which tasks an architecture can export, and each
task's model class, inputs and outputs.

Task names are Optimum's (feature-extraction, fill-mask, text-classification, ...). A model's
*modality* (text, vision, audio) is read from what its base model's forward takes (input_ids,
pixel_values, input_values); a task applies to a model type when transformers' Auto table
for that task lists the type.

    auto_task({"model_type": "bert", "architectures": ["BertForTokenClassification"]})
    # -> "token-classification"
    valid_tasks("vit")   # ("image-feature-extraction", "image-classification")
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from surgery.errors import OptionError
from surgery.io.guards import escape_name


@dataclass(frozen=True)
class Task:
    """One export task: the transformers Auto class building it, the Auto table (in
    transformers.models.auto.modeling_auto) listing its classes per model type, the modalities
    it applies to, and its outputs ({name: {axis: symbolic name}}, "seq" = the modality's
    sequence axis)."""

    name: str
    auto_class: str
    table: str
    modalities: tuple[str, ...]
    outputs: dict[str, dict[int, str]] = field(default_factory=dict)


_SEQ = {0: "batch", 1: "seq"}
TASK_TABLE: dict[str, Task] = {t.name: t for t in (
    # Heads first: auto picks the first task whose table lists the checkpoint's class.
    Task("causal-lm", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("text",),
         {"logits": _SEQ}),
    # Encoder-decoder generation (T5, BART, Marian; Whisper): exported as Optimum's encoder_model.onnx +
    # decoder graphs (surgery.onnx.seq2seq), never through the one-graph path.
    Task("text2text-generation", "AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", ("text",),
         {"logits": _SEQ}),
    Task("speech2seq-lm", "AutoModelForSpeechSeq2Seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
         ("audio features",), {"logits": _SEQ}),
    Task("fill-mask", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("text",), {"logits": _SEQ}),
    Task("text-classification", "AutoModelForSequenceClassification",
         "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", ("text",), {"logits": {0: "batch"}}),
    Task("token-classification", "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
         ("text",), {"logits": _SEQ}),
    Task("question-answering", "AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
         ("text",), {"start_logits": _SEQ, "end_logits": _SEQ}),
    Task("multiple-choice", "AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", ("text",),
         {"logits": {0: "batch", 1: "choices"}}),
    Task("image-classification", "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
         ("vision",), {"logits": {0: "batch"}}),
    Task("audio-classification", "AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
         ("audio",), {"logits": {0: "batch"}}),
    Task("automatic-speech-recognition", "AutoModelForCTC", "MODEL_FOR_CTC_MAPPING_NAMES", ("audio",),
         {"logits": _SEQ}),
    Task("zero-shot-image-classification", "AutoModelForZeroShotImageClassification",
         "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES", ("text+vision",),
         {"logits_per_image": {0: "image_batch", 1: "batch"}, "logits_per_text": {0: "batch", 1: "image_batch"}}),
    # Base models last.
    Task("feature-extraction", "AutoModel", "MODEL_MAPPING_NAMES", ("text", "audio"), {"last_hidden_state": _SEQ}),
    Task("image-feature-extraction", "AutoModel", "MODEL_MAPPING_NAMES", ("vision",),
         {"last_hidden_state": {0: "batch"}}),
)}
#: the sequence axis of each modality's inputs ("samples" for raw audio; its outputs have "frames")
SEQ_AXIS = {"text": "sequence", "audio": "frames", "vision": "sequence"}
#: the input each modality's base model takes first
_MODALITY_INPUT = (("input_ids", "text"), ("pixel_values", "vision"), ("input_values", "audio"),
                   ("input_features", "audio features"))


def _table(task: Task) -> Mapping[str, Any]:
    import transformers.models.auto.modeling_auto as auto

    return getattr(auto, task.table, {})


def _names(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(v for v in value or () if isinstance(v, str))


@functools.cache
def modality(model_type: str | None) -> str:
    """"text", "vision", "audio" or "audio features": what the model type's base model takes
    (text when transformers does not know the type).

    Example: modality("wav2vec2") == "audio"; modality("bert") == "text"."""
    import transformers

    base = _table(TASK_TABLE["feature-extraction"]).get(model_type or "")
    for name in _names(base):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        params = inspect.signature(cls.forward).parameters
        if "input_ids" in params and "pixel_values" in params:
            return "text+vision"  # CLIP, SigLIP
        for arg, kind in _MODALITY_INPUT:
            if arg in params:
                return kind
    return "text"


def valid_tasks(model_type: str | None) -> tuple[str, ...]:
    """The tasks export-onnx can export for `model_type`, base model first.

    Example: valid_tasks("bert")[:3] == ("feature-extraction", "causal-lm", "fill-mask")"""
    kind = modality(model_type)
    known = [t for t in TASK_TABLE.values() if kind in t.modalities]
    listed = [t.name for t in known if (model_type or "") in _table(t)]
    if not listed:  # transformers does not list the type (yet): every task of its modality
        listed = [t.name for t in known]
    base = [n for n in listed if n.endswith("feature-extraction")]
    return tuple(base + [n for n in listed if n not in base])


def arch_task(arch: str, model_type: str | None) -> str | None:
    """The task a transformers class name computes ("BertForTokenClassification" ->
    token-classification), or None when no task computes it (BertForPreTraining)."""
    kind = modality(model_type)
    for task in TASK_TABLE.values():
        if kind not in task.modalities and model_type is not None:
            continue
        table = _table(task)
        if arch in _names(table.get(model_type or "")) or any(arch in _names(v) for v in table.values()):
            return task.name
    if arch.endswith("Model") and not arch.endswith("LMHeadModel"):
        return "image-feature-extraction" if kind == "vision" else "feature-extraction"
    return None


def auto_task(raw: Mapping[str, Any]) -> str:
    """The task config.json's `architectures` computes; never one that drops the checkpoint's head.

    Raises:
        OptionError: the named architecture has a head no export task computes (field task).
    """
    model_type = raw.get("model_type") if isinstance(raw.get("model_type"), str) else None
    archs = [a for a in raw.get("architectures") or [] if isinstance(a, str)]
    for arch in archs:
        found = arch_task(arch, model_type)
        if found is not None:
            return found
    if archs:
        raise OptionError(f"{escape_name(archs[0], 100)} has a head no export task computes; valid tasks for "
                          f"{model_type}: {', '.join(valid_tasks(model_type))} (feature-extraction exports the "
                          "backbone without the head)", field="task")
    return "image-feature-extraction" if modality(model_type) == "vision" else "feature-extraction"


def check_task(task: str, model_type: str | None) -> None:
    """Refuse a task the architecture cannot export, listing those it can.

    Raises:
        OptionError: field task, e.g. "task 'fill-mask' does not apply to vit; valid tasks: ..."."""
    kind = modality(model_type)
    if kind == "audio features" and task != "speech2seq-lm":
        raise OptionError(f"{model_type} takes input_features (spectrograms): export-onnx exports it only as "
                          "speech2seq-lm (automatic-speech-recognition-with-past), an encoder-decoder",
                          field="task")
    valid = valid_tasks(model_type)
    if task not in valid:
        raise OptionError(f"task '{task}' does not apply to {model_type} (a {kind} model); valid tasks: "
                          f"{', '.join(valid)}", field="task")
