"""memvault: resumable, verified uploads of memories into capsules."""

__version__ = "0.1.0"
