"""The checkout the tests check, found from this file so that a test module in any subfolder of
tests/ reads the same root."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
