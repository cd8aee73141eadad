"""``python -m alloter_mp``: the ``alloter-mp`` command."""

from alloter_mp.cli import main

raise SystemExit(main())
