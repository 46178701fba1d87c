"""demask: the library behind custom_demask_eval.py (decode core, decoders, models, tasks, report).

The entry script at the repository root holds the editable decoder, the label table, the run loop
and the command line; everything it and the scripts reuse lives here. REPO is the repository root,
against which data/ and models/ paths resolve.
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
