"""The edge agent: drafts with a small local GGUF model and lets the verifier commit the text."""
