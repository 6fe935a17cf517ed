"""Evaluation: scoring a split and its metrics (:mod:`.classification`), the ``softprompt eval``
command (:mod:`.evaluate`, options in :mod:`.options`), and what a prompt learned
(:mod:`.inspection`)."""
