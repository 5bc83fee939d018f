"""Weights from and to files: atomic writes and safe reads (:mod:`.io`), the accelerator's deploy
layout (:mod:`.deploy`), and other libraries' files converted into our model (:mod:`.foreign`)."""
