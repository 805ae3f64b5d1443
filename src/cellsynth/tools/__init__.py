"""Build scripts of the shipped weights, run by hand (never imported by the library).

- ``python -m cellsynth.tools.train_default``: the default counter (``resources/models/counter-default``);
- ``python -m cellsynth.tools.calibrate``: its peak filtering, calibrated on synthetic images;
- ``python -m cellsynth.tools.train_demo``: the demo staining model (``resources/models/stain-demo``).

They may use the rooms' internals (the counter's network module); nothing in the
library, the CLI or the napari plugin imports this package.
"""
