"""`make demo`: the provider's main job, end to end, on this machine."""
