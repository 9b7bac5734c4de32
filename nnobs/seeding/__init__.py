"""Seeded initialisation: grow a trained small model into a larger one that computes exactly
what it did (:mod:`~nnobs.seeding.grow`), train the small one with an auxiliary task on an
exact Python attribute (:mod:`~nnobs.seeding.aux`), and test whether the seeded
representation persists while the large one trains (:mod:`~nnobs.seeding.experiment`,
analysed by :mod:`~nnobs.seeding.analysis`)."""
