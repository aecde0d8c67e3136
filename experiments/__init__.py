"""The experiment binaries: `python -m experiments.<name> --flags` (README.md).

Started that way, a binary first re-executes itself with malloc set to use huge pages where
that helps (`dmf_jax.core.host.start_with_huge_pages`; `--nohuge_pages` leaves it out). This
runs before the binary imports anything heavy; importing these modules from a program or a
test changes nothing.
"""

from dmf_jax.core import host as _host

_host.start_with_huge_pages(__name__)
