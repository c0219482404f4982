"""Evaluation: FVD with the Kinetics-400 I3D, prompt-following on synthetic video, PSNR/SSIM."""
