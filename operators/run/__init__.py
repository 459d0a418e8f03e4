"""The run on the driver: the CLI conventions of every entry script (cli), planning what to
embed (planning), the run's bookkeeping and reports (bookkeeping), the output lease (lease) and the
quality gate (gate).

May import: every other sub-package; nothing imports it.
"""
