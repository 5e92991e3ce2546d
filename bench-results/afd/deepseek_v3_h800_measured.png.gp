set terminal pngcairo size 900,600
set output 'bench-results/afd/deepseek_v3_h800_measured.png'
set grid
set key top left
set xlabel 'attention GPUs (the rest FFN)'
set ylabel 'tokens/s per GPU (cost model)'
set title 'afd plan: deepseek-v3 on 32 GPUs of h800-measured, context 4096, TPOT <= 50.00 ms'
$m1 << EOD
1 45.237342
2 91.775073
3 135.526102
4 175.262624
5 209.554174
6 248.616624
7 263.188080
8 370.623449
9 383.137520
10 425.415711
11 426.580190
12 459.915034
13 448.837213
14 429.743763
15 394.104939
16 580.597272
17 425.990349
18 348.981613
19 262.500527
20 138.318879
EOD
$m2 << EOD
1 85.425318
2 173.560461
3 256.157776
4 331.181119
5 395.201011
6 474.126850
7 499.776938
8 692.269005
9 711.395671
10 790.206351
11 786.832616
12 858.110484
EOD
$m3 << EOD
2 26.265575
4 15.020731
EOD
plot $m1 using 1:2 with linespoints title 'm = 1', $m2 using 1:2 with linespoints title 'm = 2', $m3 using 1:2 with linespoints title 'm = 3', 1965.153387 with lines dt 2 lw 2 title 'colocated'
