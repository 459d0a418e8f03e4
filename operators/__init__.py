"""corpus-embed operators, in sub-packages that depend one way (tests/test_layout.py holds it):

    methods -> config -> io -> model -> execution | evaluation -> run

Each may import only those left of it; only `execution` imports Ray, and the `pipelines/`
scripts wire them together. Each sub-package's docstring says what it holds.
"""

__version__ = "0.1.0"
