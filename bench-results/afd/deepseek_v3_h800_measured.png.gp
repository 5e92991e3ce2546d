set terminal pngcairo size 900,600
set output 'bench-results/afd/deepseek_v3_h800_measured.png'
set grid
set key top left
set xlabel 'attention GPUs (the rest FFN)'
set ylabel 'tokens/s per GPU (cost model)'
set title 'afd plan: deepseek-v3 on 32 GPUs of h800-measured, context 4096, TPOT <= 50.00 ms'
$m1 << EOD
1 45.249611
2 91.833201
3 135.680403
4 175.594650
5 210.216234
6 252.193001
7 272.062275
8 370.623449
9 383.241060
10 425.683875
11 427.064352
12 465.735699
13 455.888716
14 438.551237
15 413.714460
16 580.597272
17 426.105546
18 349.201527
19 273.175720
20 138.582085
EOD
$m2 << EOD
1 85.425318
2 173.560461
3 256.157776
4 331.181119
5 395.201011
6 474.126850
7 508.936902
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
