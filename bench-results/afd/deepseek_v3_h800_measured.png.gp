set terminal pngcairo size 900,600
set output 'bench-results/afd/deepseek_v3_h800_measured.png'
set grid
set key top left
set xlabel 'attention GPUs (the rest FFN)'
set ylabel 'tokens/s per GPU (cost model)'
set title 'afd plan: deepseek-v3 on 32 GPUs of h800-measured, context 4096, TPOT <= 50.00 ms'
$m1 << EOD
1 50.676445
2 99.376597
3 146.921209
4 192.911586
5 235.631802
6 277.850694
7 315.809994
8 406.781173
9 445.044752
10 476.330651
11 503.135305
12 525.211338
13 537.210288
14 542.905334
15 535.695491
16 642.816486
17 564.335016
18 472.810970
19 368.160138
20 250.139072
21 118.356868
EOD
$m2 << EOD
1 95.503408
2 188.292911
3 278.200248
4 365.044252
5 445.280072
6 520.566186
7 595.523957
8 763.621643
9 834.215700
10 890.694325
11 938.312332
12 976.611477
13 994.527285
14 999.994781
EOD
$m3 << EOD
1 135.426044
2 266.833313
3 393.982974
4 512.505527
5 290.684770
EOD
plot $m1 using 1:2 with linespoints title 'm = 1', $m2 using 1:2 with linespoints title 'm = 2', $m3 using 1:2 with linespoints title 'm = 3', 1965.153387 with lines dt 2 lw 2 title 'colocated'
