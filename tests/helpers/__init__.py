"""Shared by the test tiers: fake GPU layers (:mod:`.fake_cuda`), the ground truth of the launched
tests (:mod:`.stores`), the rank functions they run, one concept a module (:mod:`.prefetch_rankfns`,
:mod:`.integrity_rankfns`, :mod:`.usage_rankfns`, :mod:`.launch_rankfns`, :mod:`.fault_rankfns`,
:mod:`.moe_rankfns`, :mod:`.hf_rankfns`, :mod:`.gpu_rankfns`, :mod:`.graph_rankfns`) and the
expert-MLP and kernel cases of both tiers (:mod:`.experts_cases`, :mod:`.kernel_cases`). Imported as
``tests.helpers.<module>``: pytest runs from the repository root, where ``tests`` is a package."""
