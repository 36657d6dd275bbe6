"""Files in and out: strict checkpoint reading and hub resolution, the meta JSON / images / hidden states, atomic outputs (MP4, JSON)."""
