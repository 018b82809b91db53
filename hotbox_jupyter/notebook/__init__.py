"""The notebook front: the ``%%hotbox`` magics, the rendering of events, and the widgets.

Nothing here knows Docker or QEMU: it consumes :mod:`hotbox_jupyter.events` and the ``box`` facade.
"""
