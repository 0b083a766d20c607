"""darkroom studio: a local web app to render an image and look inside the transformer.

``runs`` queues renders on the one GPU; ``engine`` loads the model and renders with the
instruments of :mod:`trainer.introspect`; ``pictures`` turns results into PNGs; ``app``
serves the API and the browser UI in ``static/``.
"""
