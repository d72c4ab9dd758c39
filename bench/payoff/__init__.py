"""The modules of ``bench/subnet_payoff.py`` (issues 30, 41), one concept each: the study's names (``study``), scoring
trained networks (``scoring``), the network records (``network_records``), the fair front's picks (``fair_front``), the
fine-tuning lever (``finetuning``), the reports (``fair_report``, ``by_data_size``, issue 30's ``front_32px``) and
their cells (``tables``). Imported with ``bench/`` on the path, as the script puts it there."""
