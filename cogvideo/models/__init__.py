"""Model families other than CogVideo, one package each (registered as `ModelFamily`s)."""
