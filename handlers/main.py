"""AdaOS's entry-point convention: ``python -m handlers.main`` starts the same service as ``python -m skill``.

AdaOS's installer (``neural_skill_installer._candidate_source_roots``) accepts a skill source tree only
when it holds ``skill.yaml`` and this file. It is a thin shim: every flag of ``python -m skill`` works
here too, and ``service.command`` in ``skill.yaml`` may name either module.
"""

from __future__ import annotations

import sys

from skill.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
