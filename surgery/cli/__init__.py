"""The click front-end of surgery: parse, call the library, render."""
