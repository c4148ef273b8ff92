"""The demo: an application of the sigvlp library (``sigvlp demo``, ``sigvlp synth``).

- ``sigvlp.demo.synth``: synthetic chest-CT phantoms written in the CT-RATE layout;
- ``sigvlp.demo.recipe``: the demo's data sets, model overrides and training recipe;
- ``sigvlp.demo.run``: ``run_demo`` (phantoms, training, zero-shot scoring) and its command.

The core package (``sigvlp`` minus this package) imports nothing from here; only the command
line shell (``sigvlp.cli``) names the two commands' modules, and imports them when it builds its
parser (tests/test_package.py checks this). Importing this package loads nothing else.
"""
