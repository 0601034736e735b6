from benchmarks.quality import verdict


def test_verdict_is_the_ndcg_difference_to_each_rival_where_both_were_evaluated():
    metrics = {"video": {"lsvcr": {"ndcg@10": 0.30}, "sr_no_align": {"ndcg@10": 0.25}, "sasrec": {"ndcg@10": 0.35}},
               "comment": {"lsvcr": {"ndcg@10": 0.20}}}
    # 0.30 - 0.25 = 0.05 and 0.30 - 0.35 = -0.05, sasrec the strongest other; the comment task has no rival.
    assert verdict(metrics) == {"video_ndcg@10_lsvcr_minus_sr_no_align": 0.05,
                                "video_ndcg@10_lsvcr_minus_sasrec": -0.05, "video_strongest_other": "sasrec",
                                "video_ndcg@10_lsvcr_minus_strongest_other": -0.05}
