"""Hand-written data (task templates, prompts, concept texts), installed as the package
``interp.resources`` so that it is there in any install; read it with ``interp.paths.resource``."""
