"""``python -m clframe`` runs the ``clframe`` command."""

from clframe.entry import main

main()
