"""The ``tinysft`` command, built on the engine (``tinysft.tensor``, ``functional``, ...) and its
libraries (``nn``, ``optim``, ``finetune``, ``data``, ``io``, ``models``, ``verify``).

cli.py         the argument parser and ``main``: one line per user error, exit status 2
config.py      RunConfig: defaults, a TOML file, flags; the TOML writer
run_folder.py  the run folder's files: written by finetune, read by eval and predict
finetune.py    ``tinysft finetune``
evaluate.py    ``tinysft eval``
predict.py     ``tinysft predict``
embed.py       ``tinysft embed``
plots.py       PNG plots of a run's metrics.jsonl
output.py      printing lines and metrics
(``tinysft verify`` is ``tinysft.verify.main``.)
"""
