"""ISA: in-context sparse attention policy for video-editing DiTs."""
