"""Text prompts of DuPLUS: T1 context and T2 target templates, the text encoder and the prompt cache.

Training and inference never run the text encoder themselves: they look embeddings up in the cache.
"""
