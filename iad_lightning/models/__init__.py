"""Plain torch models (no Lightning): backbones, PatchCore, and later PDN, UniAD, CLIP."""
