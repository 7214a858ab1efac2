"""The experiment harness above the library: the serve runner and its run config (runner.py,
runconfig.py), the command line of every config-driven main (cli.py), run records
(runrecord.py), the real-text job (text.py, textjob.py), the swapping
and disaggregation studies (swapstudy.py, disagg_experiment.py, splits.py), the failure campaign
(campaign.py), the paper's evaluation setting and metric shared by the figures (paper.py) and
figure output (reporting.py: rows, tables, plots). Nothing in the library
imports this package."""
