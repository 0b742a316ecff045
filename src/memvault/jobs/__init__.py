"""Background work that must survive crashes: derivative jobs (queue + runner)."""
