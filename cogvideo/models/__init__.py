"""The model families, one package each (each registers a `ModelFamily` when imported):
CogVideo (`cogvideo`, the default), CogView2's direct super-resolution (`dsr`), GLOBER, HPDM."""
