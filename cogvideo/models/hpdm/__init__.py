"""HPDM: hierarchical patch diffusion in pixel space (Skorokhodov et al., CVPR 2024)."""
