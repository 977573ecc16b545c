"""Tiny offline replicas of the newer pipeline families, one module per group.

Each module holds ``BUILDERS``: family name -> a function returning a :class:`tests.pipelines.tiny_pipelines.Replica`
(components built from configs with seeded random weights, driven by ``prompt_embeds``; no tokenizer, no hub).
``tiny_pipelines.build(name)`` looks names up here after its own families.
"""

from __future__ import annotations

from tests.pipelines.replicas import image, motion, video

BUILDERS = {**image.BUILDERS, **video.BUILDERS, **motion.BUILDERS}
