"""matplotlib backend of Hot Box cells: Agg drawing, ``plt.show()`` sends figures to the notebook as PNG.

Selected by ``cell.py`` through ``MPLBACKEND=module://hotbox_mpl_backend``; imported by matplotlib only,
so a box without matplotlib never loads it.
"""

from __future__ import annotations

import sys
from typing import Any

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def show(*args: Any, **kwargs: Any) -> None:
    """Send the open figures as display frames and close them (the runner does the sending)."""
    runner = sys.modules.get("hotbox_cell")
    if runner is not None:
        runner.show_figures()
