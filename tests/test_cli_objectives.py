"""``vlp objectives``: every registered objective with its default rows, teacher use and paper (issue #33)."""
from __future__ import annotations

from vlp.cli import main, paper_of
from vlp.objectives import OBJECTIVES


def test_paper_of_reads_the_citation_a_module_docstring_opens_with():
    assert paper_of('SimCLR (Chen et al. 2020, "A Simple Framework"): two views (k=2).') == \
        'Chen et al. 2020, "A Simple Framework"'
    assert paper_of("Supervised classification: cross-entropy (label >= 0). More.") == \
        "Supervised classification: cross-entropy (label >= 0)"


def test_vlp_objectives_lists_every_objective_with_its_paper(capsys):
    assert main(["objectives"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["objective", "module", "rows", "teacher"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == set(OBJECTIVES)
    papers = {"colorization": "Zhang, Isola & Efros 2016", "context": "Doersch, Gupta & Efros 2015",
              "beit": "arXiv:2106.08254", "multilabel": "Mahajan et al. 2018", "simclr": "Chen et al. 2020",
              "dino": "Caron et al. 2021", "mae": "He et al. 2022", "contrastive": "Radford et al. 2021"}
    for name, paper in papers.items():
        assert paper in listed[name], listed[name]
    assert listed["supervised"].split()[2] == "labeled"
    assert listed["simclr"].split()[2] == "unlabeled"
    assert listed["dino"].split()[3] == "yes" and listed["rotation"].split()[3] == "no"
