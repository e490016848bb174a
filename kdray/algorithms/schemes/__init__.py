"""Schemes decide who teaches whom: offline, online (DML), self (BYOT, born-again), assistant (TAKD), multi-teacher,
adversarial (a discriminator against the student)."""
