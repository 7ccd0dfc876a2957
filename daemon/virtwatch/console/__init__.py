"""Console capture, a feature of its own: each selected guest's serial console
in a bounded ring, crash records in ``console.sqlite``, and their readers.
The daemon (``app.py``) needs :class:`~virtwatch.console.capture.ConsoleCapture`; the
configuration (``config.py``) needs :class:`~virtwatch.console.settings.ConsoleSettings`.
Nothing is imported here, so that reading the configuration does not load the feature.
"""
