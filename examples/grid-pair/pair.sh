# Runs inside each guest, in /job. peer-0 is instance 0's name in /etc/hosts.
mkdir -p out
if [ "$ROLE" = 0 ]; then
  echo "hello from instance 0 at $VMGRID_ADDR" | nc -l -p 5000 > out/got.txt
else
  # Instance 0 may still be booting: try until it listens.
  until echo "hello from instance 1 at $VMGRID_ADDR" | nc -w 10 peer-0 5000 > out/got.txt && [ -s out/got.txt ]; do
    sleep 1
  done
fi
echo "instance $ROLE received: $(cat out/got.txt)"
