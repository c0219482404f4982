"""The diffusion core shared by the diffusion families (GLOBER, HPDM): noise schedules, losses,
samplers (taken from diffusers, not hand-written) and classifier-free guidance."""
