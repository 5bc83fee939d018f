"""One module per script's report: :mod:`.test` (``test.py``), :mod:`.quantize` (``test_quantize.py``),
:mod:`.predict` (``predict.py``), :mod:`.export` (``export.py``); :mod:`.outputs` what they share."""
