"""AdaOS's skill entry-point package (``handlers/main.py``); the service itself lives in ``skill``."""
