"""alambic: LLM knowledge distillation from both sides of the API."""

__version__ = "0.1.0"
