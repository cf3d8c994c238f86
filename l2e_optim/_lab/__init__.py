"""The lab: the application built on the optimizer library (``l2e_optim._src``).

Command line (``python -m l2e_optim demo|analyze``), byte corpora with feature labels, the
pretraining loop, the monosemanticity analysis of a trained model, reports and figures, and the
small models that tests and benchmarks share (``zoo``). The lab imports the library; the library
never imports the lab (``tests/test_layout.py`` enforces it). Nothing here is public API.
"""
