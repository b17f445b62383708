"""``harness distill ...``: trainers for cleaners that carry weights (PH-Reg students, DVT denoisers).

Each trainer is one module with ``run(args) -> int`` (``harness/cli.py`` names them in ``DISTILLERS``) built on
:mod:`harness.distill.common` (checkpoints, resume, progress, loss curves). Its output loads with
``--method NAME --method-weights FILE`` in every evaluator.
"""
