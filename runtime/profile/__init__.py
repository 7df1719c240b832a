"""python -m runtime.profile: measured hardware profiles (and roofline ones) for the simulator.

    python -m runtime.profile [--model NAME ...] [--quick] [--roofline NAME] [--out PATH]

`load(path)` reads and validates a profile (core/profile/schema.py describes the file).
"""
from core.profile.schema import SCHEMA_VERSION, ProfileError, load, validate

__all__ = ["SCHEMA_VERSION", "ProfileError", "load", "validate"]
