"""Shared by the test tiers: fake GPU layers (:mod:`.fake_cuda`), rank functions the launched tests
run (:mod:`.rankfns`, :mod:`.moe_rankfns`, :mod:`.hf_rankfns`, :mod:`.gpu_rankfns`,
:mod:`.graph_rankfns`) and the expert-MLP cases of both tiers (:mod:`.experts_cases`). Imported as
``tests.helpers.<module>`` (the repository root is on ``sys.path`` under pytest)."""
