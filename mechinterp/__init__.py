"""mechinterp: retrieval heads in long-context LLMs — detect, knock out, patch."""

__version__ = "0.1.0"
