"""The ``tinysft`` command, built on the engine (``tinysft.tensor``, ``functional``, ...) and its
libraries (``nn``, ``optim``, ``finetune``, ``data``, ``io``, ``models``, ``verify``).

cli.py         the argument parser and ``main``: one line per user error, exit status 2
config.py      every command's settings in one declarative table (type, range, meaning): flags, TOML, checks
files.py       reading the JSON files a command is given, each error naming the file
run_folder.py  the run folder's files: written by finetune and sft, read by the other commands
finetune.py    ``tinysft finetune`` (and ``--seeds``)
evaluate.py    ``tinysft eval``
predict.py     ``tinysft predict``
embed.py       ``tinysft embed``
ensemble.py    ``tinysft ensemble``
distill.py     ``tinysft distill``
generate.py    ``tinysft generate`` and the decoder loading the decoder commands share
chat.py        ``tinysft chat``
sft.py         ``tinysft sft``
serve.py       ``tinysft serve``
plots.py       PNG plots of a run's metrics.jsonl
output.py      printing lines and metrics
(``tinysft verify`` is ``tinysft.verify.main``.)
"""
