"""On-device NLU service skill for AdaOS: canonicalize, regex, neural ranker, LLM fallback, gates."""

__version__ = "0.1.0"
SERVICE_NAME = "adaos-neural-nlu"
